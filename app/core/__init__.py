"""Infrastructure shared by every resource package."""
