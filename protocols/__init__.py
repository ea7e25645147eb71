"""Protocol services: each subpackage answers one plain protocol from guests and speaks only its
secure version outside. They import `policy` and receive everything else through `ServiceContext`."""
