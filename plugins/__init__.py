"""First-party mdmrl plug-ins, registered through the ``mdmrl`` entry-point group."""
