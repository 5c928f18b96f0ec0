"""Coverage-guided fuzz targets for the mesh's parsers (`make fuzz`); see fuzz/README.md."""
