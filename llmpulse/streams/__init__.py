"""The stream worker (Faust): event-time windows, partial merging, rules and alerts."""
