# `with`: a rule asked again with part of the input replaced. Payment may do to users
# anything but delete, by asking the GET rule with the method replaced; the rule reached
# through `with` sees the replaced input and the rest of `data`.
package authz

import rego.v1

default allow := false

reads_users if {
	input.client_spiffe_id == "spiffe://example.org/ns/default/sa/payment"
	input.method == "GET"
	startswith(input.path, "/v1/users/")
}

allow if {
	data.authz.reads_users with input.method as "GET"
	input.method != "DELETE"
}
