"""Process plumbing: named task sets, garbage-collector pauses, returning freed memory."""
