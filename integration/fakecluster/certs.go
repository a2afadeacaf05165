package fakecluster

import "github.com/caddy-kas/caddy-kas/internal/testca"

// newAuthority makes the CA a Cluster makes for itself and the one serving
// certificate it issues, valid for the loopback interface only.
func newAuthority() (*testca.CA, error) { return testca.New("fakecluster test CA") }
