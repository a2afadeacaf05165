package agentk

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
)

// ServiceAccountDir is where Kubernetes mounts a pod's service account
// token and the cluster's CA certificate.
const ServiceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// ErrNotInCluster is returned by [InCluster] when the environment does not
// name the apiserver's service.
var ErrNotInCluster = errors.New("not running in a Kubernetes cluster: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set")

// InCluster returns the cluster agentk runs in, reached the way client-go's
// rest.InClusterConfig does: the apiserver's service address from
// KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT (passed in host and
// port), and the service account's token and CA from dir (normally
// [ServiceAccountDir]). The token is re-read as kubelet rotates it.
func InCluster(dir, host, port string) (*Cluster, error) {
	return inCluster(dir, host, port, clockOptions{})
}

func inCluster(dir, host, port string, co clockOptions) (*Cluster, error) {
	if host == "" || port == "" {
		return nil, ErrNotInCluster
	}
	server, err := parseServerURL("https://" + net.JoinHostPort(host, port))
	if err != nil {
		return nil, fmt.Errorf("in-cluster config: %w", err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("in-cluster config: reading the cluster CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("in-cluster config: %s holds no PEM certificate", filepath.Join(dir, "ca.crt"))
	}
	token, err := newFileToken(filepath.Join(dir, "token"), co.refreshInterval, co.now)
	if err != nil {
		return nil, fmt.Errorf("in-cluster config: %w", err)
	}
	return newCluster(clusterSpec{
		server: server,
		tls:    &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool},
		cred:   token,
	}), nil
}
