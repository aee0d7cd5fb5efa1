"""The config file: the reader with file:line errors, units, the schema, the extension contract's config side and the registry of filters and terminals."""
