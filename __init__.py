"""replfs: a FUSE-mounted, replicated, transactional filesystem.

The project's top-level folders (raid/, txn/, fs/, replication/, tools/) install
as subpackages of this one import name; see pyproject.toml.
"""

__version__ = "0.1.0"
