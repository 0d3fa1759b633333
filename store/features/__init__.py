"""Feature tables of SAE latents: the on-disk format, the writer, the merged generation, statistics and the reader."""
