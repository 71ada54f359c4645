"""What every batch job shares: shards of the study keys, part files, gathering and provenance."""
