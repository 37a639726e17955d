"""One place for every table's Arrow schema and every config model."""
