"""Where the stream ends: the ClickHouse writer and schema, and the notifier."""
