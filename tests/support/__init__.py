"""Local stand-ins for S3 and the Hugging Face Hub, plus a fault-injecting proxy (see their docstrings)."""
