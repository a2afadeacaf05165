// Package integration holds the end-to-end tests of caddy-kas.
//
// The tests run real processes only: the caddy and agentk binaries built from
// this repository, a real etcd and kube-apiserver, and the real kubectl. Each
// test starts its own Caddy (with its own internal CA and state directory) and
// its own agentk processes; one etcd and kube-apiserver serve the whole package.
//
// The tests need the environment variable KUBE_TESTBIN to name a directory
// holding kube-apiserver and etcd binaries (hack/kube-apiserver/build.sh
// builds them and prints that directory; hack/test.sh does all of it). Without
// KUBE_TESTBIN the tests are skipped, unless CI=true, where that is an error.
package integration
