"""What outlives a call: recordings (spooled WAV, uploaded to S3) and transcripts (PostgreSQL or
SQLite, spooled through outages)."""
