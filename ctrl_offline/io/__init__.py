"""Files: Parquet tables and their metadata, atomic output folders, a build's recorded metadata."""
