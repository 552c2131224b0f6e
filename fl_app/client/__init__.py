"""The ClientApp side of a round (docs/architecture.md, Client).

``fl_app.client.app`` holds the ClientApp object Flower loads
(``[tool.flwr.app.components] clientapp``); the other modules are what its handlers
use: the fixed train pipeline, the site's policy. Nothing is re-exported here, so
importing the package stays cheap (a fresh ClientApp process runs each message).
"""
