"""Deployment files, shipped inside the package as ``tensorslm.deploy`` (data only: read them
through :func:`tensorslm.shipped.shipped_file`)."""
