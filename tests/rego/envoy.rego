# A policy written for OPA-Envoy's ext_authz v3 input, in Rego v1 syntax: the principal
# under attributes.source, the request under attributes.request.http, parsed_path and
# parsed_query; an object decision with a status, headers and a body.
package envoy.authz

import rego.v1

default allow := false

allow if {
	input.attributes.source.principal == "spiffe://example.org/ns/default/sa/payment"
	input.attributes.request.http.method == "GET"
	input.parsed_path = ["v1", "users", _]
}

allow if {
	startswith(input.attributes.source.principal, "spiffe://example.org/ns/ops/")
	input.parsed_query.debug == ["1"]
	input.attributes.request.http.headers["x-workload-id"] == input.attributes.source.principal
}

# Anyone may list users, ten at a time. A limit that is not a number makes to_number
# fail, which makes this body undefined (OPA's non-strict builtins), not an error.
allow if {
	input.attributes.request.http.method == "GET"
	input.parsed_path == ["v1", "users"]
	to_number(input.parsed_query.limit[0]) <= 10
}

# A validated JWT-SVID for our audience may read the health endpoint.
allow if {
	"users" in input.jwt_claims.aud
	input.attributes.request.http.method == "GET"
	input.parsed_path == ["v1", "health"]
}

response := {"allowed": true, "headers": {"x-authz": "rego"}} if allow

response := {"allowed": false, "http_status": 404, "body": "no such route", "headers": {"x-authz": "rego"}} if {
	not allow
	input.parsed_path[0] == "admin"
}
