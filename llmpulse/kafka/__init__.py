"""Kafka plumbing shared by every component: topics, client settings, the broker address."""
