"""pgconv.converter: key maps (data), readers/writers, streaming conversion, fixtures."""
