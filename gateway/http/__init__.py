"""HTTP and WebSocket edges: carrier webhooks and media sockets (routes), the session and call API
(control), the API key (auth), request limits and the HTTP protocol with its header timeout."""
