"""The trio shell: the server and its connections, the committer, the admin
socket, status and metrics, online refresh."""
