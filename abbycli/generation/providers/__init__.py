"""abby's own image providers, one module each; registered as entry points like any plugin."""
