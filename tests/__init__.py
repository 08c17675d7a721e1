"""cloakbeam test suite."""
