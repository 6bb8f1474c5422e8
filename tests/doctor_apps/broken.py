"""An app whose import fails."""

raise RuntimeError("the app's settings are missing DATABASE_URL")
