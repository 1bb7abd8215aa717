"""The Ray layer: wires the library to Ray Data (certification). Adds no math."""
