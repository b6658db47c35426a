"""tbkd_lib."""
