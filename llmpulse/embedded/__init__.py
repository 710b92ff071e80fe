"""The embedded runtime: the Tansu broker and the chDB store, for one machine and no setup."""
