"""The commit protocol every artifact uses: put-if-absent data, then a checked commit record; leases with fencing; committed artifact folders."""
