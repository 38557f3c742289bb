# The seed documents' policy shape, in Rego v0 syntax as they write it: the caller's
# SPIFFE ID, the method and the path, flat at the top of the input.
package authz

default allow = false

# payment may read users.
allow {
    input.client_spiffe_id == "spiffe://example.org/ns/default/sa/payment"
    input.method == "GET"
    startswith(input.path, "/v1/users/")
}

# Operators may do anything except delete.
allow {
    startswith(input.client_spiffe_id, "spiffe://example.org/ns/ops/")
    input.method != "DELETE"
}
