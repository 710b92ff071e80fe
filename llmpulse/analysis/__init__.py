"""Reading ClickHouse: read-only queries, the query endpoint of the store's owner, reports."""
