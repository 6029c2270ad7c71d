"""Record-level rules: pure functions over one document, so the same rules can run anywhere (a local
process pool today, a Spark UDF later). Each returns a new text or a drop reason, never raises on text."""
