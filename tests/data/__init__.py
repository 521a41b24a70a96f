"""Tests of flora.data (loaders, templates, the suite, encoding) and shared tiny test models."""
