"""Activation datasets: manifest, commit state, the reader and the writer, token tables,
document index, batches, alignment, versions, verify and repair."""
