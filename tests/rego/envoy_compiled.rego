# The allow rule of envoy.rego written with other constructs (a set, a function, `some`
# and `every`, a comprehension, a builtin that can fail), and with only constant rule
# values and `=` rather than `:=`, so that svidcar evaluates it in the regorus VM rather
# than the interpreter.
# It decides every test case as envoy.rego's allow does.
package envoy.compiled

import rego.v1

default allow := false

readers contains "spiffe://example.org/ns/default/sa/payment"

get if input.attributes.request.http.method == "GET"

operator(principal) if startswith(principal, "spiffe://example.org/ns/ops/")

users_item if {
	count(input.parsed_path) == 3
	every i, segment in ["v1", "users"] {
		input.parsed_path[i] == segment
	}
}

allow if {
	some reader in readers
	input.attributes.source.principal == reader
	get
	users_item
}

allow if {
	operator(input.attributes.source.principal)
	input.parsed_query.debug == ["1"]
	input.attributes.request.http.headers["x-workload-id"] == input.attributes.source.principal
}

# Ten users at a time; a limit that is not a number is dropped by the comprehension
# (to_number fails, so that element is undefined) and nothing is allowed.
allow if {
	get
	input.parsed_path == ["v1", "users"]
	limits = [n | some s in input.parsed_query.limit; n = to_number(s)]
	count(limits) == 1
	limits[0] <= 10
}

allow if {
	"users" in input.jwt_claims.aud
	get
	regex.match(`^/v1/health$`, input.attributes.request.http.path)
}
