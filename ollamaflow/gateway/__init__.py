"""Client traffic: route each request to a healthy backend and stream the answer back."""
