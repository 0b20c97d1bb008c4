"""Pure memory math and small memory classes (no fairseq imports)."""
