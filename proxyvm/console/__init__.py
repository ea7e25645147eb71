"""The operator console (`admin.console: true`): a web page on the admin listener.

`server` has the routes, the token/session/CSRF logic and the event streams; `feed` keeps what
the pages show from the records the supervisor writes; `static/` holds plain HTML, CSS and JS
(no build step, nothing fetched from elsewhere: it works offline).
"""
