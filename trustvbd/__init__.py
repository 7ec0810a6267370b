"""trustvbd: virtual disks over untrusted storage drivers."""

__version__ = "0.1.0"
