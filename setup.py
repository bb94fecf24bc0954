"""All metadata lives in pyproject.toml ([project], [tool.setuptools]); this file lets older tools build."""

from setuptools import setup

setup()
