"""The package's version, in one place: `setup.cfg` reads it from here (`attr:`), so a source checkout on `PYTHONPATH`
(not pip-installed, hence without package metadata) reports the same version as an installed one."""

__version__ = "0.1.0"
