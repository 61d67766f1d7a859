"""What a replica may hold: the machine inventory, all-or-nothing reservations of
GPUs, CPU, memory, ports and sockets, and their release. Imports the graph and
supervision's process helpers."""
