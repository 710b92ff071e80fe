"""Everything that puts events on Kafka: proxy, SDK, HTTP ingest, GPU sampler, demo traffic."""
