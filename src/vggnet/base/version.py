"""vggnet's version, written into every card and report."""

__version__ = "0.1.0"
