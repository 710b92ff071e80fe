"""ClickHouse: schema and migrations, row conversion, the batch writer and sink consumer."""
