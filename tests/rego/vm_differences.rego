# The two places where regorus's VM and its interpreter differ and svidcar still uses the
# VM: `some x in` over a string, and `&` on values that are not sets. The interpreter
# fails the evaluation (so it would deny); the VM and the reference engine find them
# undefined, so `not` holds and the request is allowed.
package vmdiff

import rego.v1

default allow := false

has_g(s) if {
	some x in s
	x == "G"
}

allow if {
	not has_g(input.method)
	not input.method & input.path
}
