"""Protection actions (plain RecordBatch functions, no Beam) and the thin Beam steps around them."""
