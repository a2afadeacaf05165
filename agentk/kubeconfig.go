package agentk

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"sigs.k8s.io/yaml"
)

// ErrUnsupportedAuth is wrapped by errors about kubeconfig users that agentk
// cannot authenticate as: exec plugins and auth providers would need
// client-go's plugin machinery, which agentk leaves out to stay small.
var ErrUnsupportedAuth = errors.New("not supported by agentk; use a token or client certificate")

// ErrUnsupportedImpersonation is wrapped by errors about kubeconfig users
// that impersonate (as, as-groups, ...). agentk impersonates the identity
// KAS asks for; impersonation on top of it would be nested impersonation,
// which Kubernetes does not support (GitLab agentk refuses it too,
// gitlab#338664).
var ErrUnsupportedImpersonation = errors.New("impersonation in the kubeconfig is not supported by agentk")

// kubeconfig is the subset of a kubeconfig file (clientcmd/api/v1) that
// agentk understands. Other fields are ignored.
type kubeconfig struct {
	Clusters []struct {
		Name    string            `json:"name"`
		Cluster kubeconfigCluster `json:"cluster"`
	} `json:"clusters"`
	Users []struct {
		Name string         `json:"name"`
		User kubeconfigUser `json:"user"`
	} `json:"users"`
	Contexts []struct {
		Name    string `json:"name"`
		Context struct {
			Cluster string `json:"cluster"`
			User    string `json:"user"`
		} `json:"context"`
	} `json:"contexts"`
	CurrentContext string `json:"current-context"`
}

type kubeconfigCluster struct {
	Server                   string `json:"server"`
	TLSServerName            string `json:"tls-server-name"`
	InsecureSkipTLSVerify    bool   `json:"insecure-skip-tls-verify"`
	CertificateAuthority     string `json:"certificate-authority"`
	CertificateAuthorityData []byte `json:"certificate-authority-data"` // base64 in the file
	ProxyURL                 string `json:"proxy-url"`
}

type kubeconfigUser struct {
	ClientCertificate     string `json:"client-certificate"`
	ClientCertificateData []byte `json:"client-certificate-data"`
	ClientKey             string `json:"client-key"`
	ClientKeyData         []byte `json:"client-key-data"`
	Token                 string `json:"token"`
	TokenFile             string `json:"tokenFile"`
	Username              string `json:"username"`
	Password              string `json:"password"`

	Impersonate          string              `json:"as"`
	ImpersonateUID       string              `json:"as-uid"`
	ImpersonateGroups    []string            `json:"as-groups"`
	ImpersonateUserExtra map[string][]string `json:"as-user-extra"`

	AuthProvider json.RawMessage `json:"auth-provider"`
	Exec         json.RawMessage `json:"exec"`
}

// present reports whether a raw JSON field was given a non-null value.
func present(m json.RawMessage) bool { return len(m) > 0 && string(m) != "null" }

// clockOptions let tests control token file refreshes.
type clockOptions struct {
	now             func() time.Time
	refreshInterval time.Duration
}

// LoadKubeconfig reads the kubeconfig at path and returns the cluster of
// context contextName, or of the current context if contextName is empty.
// Relative file paths in it resolve against the kubeconfig's directory, as
// in kubectl. Tokens in a tokenFile are re-read as they rotate.
func LoadKubeconfig(path, contextName string) (*Cluster, error) {
	return LoadKubeconfigWithOverrides(path, KubeconfigOverrides{Context: contextName})
}

// KubeconfigOverrides are kubectl's command-line overrides of a kubeconfig
// (k8s.io/cli-runtime's genericclioptions), which GitLab's agentk accepts
// as flags. An empty field overrides nothing. File paths are relative to
// the working directory, as on kubectl's command line.
type KubeconfigOverrides struct {
	// Context chooses the context instead of the current-context.
	Context string
	// Cluster and User choose the kubeconfig's cluster and user entries
	// instead of those the context names.
	Cluster string
	User    string
	// Server replaces the cluster's server URL.
	Server string
	// CertificateAuthority replaces the cluster's CA (file and inline
	// data).
	CertificateAuthority string
	// InsecureSkipTLSVerify turns verification of the apiserver's
	// certificate off and, unless CertificateAuthority is given too,
	// drops the kubeconfig's CA, as kubectl does.
	InsecureSkipTLSVerify bool
	// TLSServerName replaces the name verified in the apiserver's
	// certificate.
	TLSServerName string
	// ClientCertificate and ClientKey replace the user's client
	// certificate (file and inline data).
	ClientCertificate string
	ClientKey         string
	// Token replaces the user's credential with this bearer token.
	Token string
}

// LoadKubeconfigWithOverrides is [LoadKubeconfig] with kubectl's
// command-line overrides applied to the chosen cluster and user.
func LoadKubeconfigWithOverrides(path string, o KubeconfigOverrides) (*Cluster, error) {
	spec, err := kubeconfigSpec(path, o, clockOptions{})
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	return newCluster(spec), nil
}

// apply puts the overrides into the chosen cluster and user entries.
func (o KubeconfigOverrides) apply(cluster *kubeconfigCluster, user *kubeconfigUser) error {
	abs := func(p string) (string, error) {
		if p == "" {
			return "", nil
		}
		return filepath.Abs(p)
	}
	var err error
	if o.Server != "" {
		cluster.Server = o.Server
	}
	if o.TLSServerName != "" {
		cluster.TLSServerName = o.TLSServerName
	}
	if o.CertificateAuthority != "" {
		if cluster.CertificateAuthority, err = abs(o.CertificateAuthority); err != nil {
			return err
		}
		cluster.CertificateAuthorityData = nil
	}
	if o.InsecureSkipTLSVerify {
		cluster.InsecureSkipTLSVerify = true
		if o.CertificateAuthority == "" {
			cluster.CertificateAuthority, cluster.CertificateAuthorityData = "", nil
		}
	}
	if o.ClientCertificate != "" {
		if user.ClientCertificate, err = abs(o.ClientCertificate); err != nil {
			return err
		}
		user.ClientCertificateData = nil
	}
	if o.ClientKey != "" {
		if user.ClientKey, err = abs(o.ClientKey); err != nil {
			return err
		}
		user.ClientKeyData = nil
	}
	if o.Token != "" {
		user.Token, user.TokenFile, user.Username, user.Password = o.Token, "", "", ""
	}
	return nil
}

// kubeconfigSpec reads the kubeconfig at path and returns what the chosen
// context, with the overrides applied, says about the cluster and user.
func kubeconfigSpec(path string, o KubeconfigOverrides, co clockOptions) (clusterSpec, error) {
	contextName := o.Context
	raw, err := os.ReadFile(path)
	if err != nil {
		return clusterSpec{}, err // already names the file
	}
	var kc kubeconfig
	if err := yaml.Unmarshal(raw, &kc); err != nil {
		return clusterSpec{}, fmt.Errorf("parsing: %w", err)
	}
	dir, err := filepath.Abs(filepath.Dir(path))
	if err != nil {
		return clusterSpec{}, fmt.Errorf("resolving its directory: %w", err)
	}
	resolve := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(dir, p)
	}

	if contextName == "" {
		contextName = kc.CurrentContext
	}
	var clusterName, userName string
	switch {
	case contextName != "":
		found := false
		for _, c := range kc.Contexts {
			if c.Name == contextName {
				clusterName, userName, found = c.Context.Cluster, c.Context.User, true
				break
			}
		}
		if !found {
			return clusterSpec{}, fmt.Errorf("context %q not found", contextName)
		}
	case o.Cluster == "":
		return clusterSpec{}, errors.New("no current-context; choose one with --context")
	}
	if o.Cluster != "" {
		clusterName = o.Cluster
	}
	if o.User != "" {
		userName = o.User
	}

	var cluster *kubeconfigCluster
	for i := range kc.Clusters {
		if kc.Clusters[i].Name == clusterName {
			cluster = &kc.Clusters[i].Cluster
			break
		}
	}
	if cluster == nil {
		return clusterSpec{}, fmt.Errorf("%scluster %q not found", contextPrefix(contextName), clusterName)
	}
	// A context without a user is anonymous, as in kubectl.
	var user kubeconfigUser
	if userName != "" {
		found := false
		for i := range kc.Users {
			if kc.Users[i].Name == userName {
				user, found = kc.Users[i].User, true
				break
			}
		}
		if !found {
			return clusterSpec{}, fmt.Errorf("%suser %q not found", contextPrefix(contextName), userName)
		}
	}

	// Copies, so that the overrides do not change the parsed file.
	clusterEntry, userEntry := *cluster, user
	cluster = &clusterEntry
	if err := o.apply(cluster, &userEntry); err != nil {
		return clusterSpec{}, err
	}
	user = userEntry

	var spec clusterSpec
	if spec.server, err = parseServerURL(cluster.Server); err != nil {
		return clusterSpec{}, fmt.Errorf("cluster %q: %w", clusterName, err)
	}
	if cluster.ProxyURL != "" {
		if spec.proxy, err = url.Parse(cluster.ProxyURL); err != nil {
			return clusterSpec{}, fmt.Errorf("cluster %q: parsing proxy-url: %w", clusterName, err)
		}
	}
	tlsConfig, err := clusterTLS(cluster, resolve)
	if err != nil {
		return clusterSpec{}, fmt.Errorf("cluster %q: %w", clusterName, err)
	}
	if err := userTLS(tlsConfig, &user, resolve); err != nil {
		return clusterSpec{}, fmt.Errorf("user %q: %w", userName, err)
	}
	spec.tls = tlsConfig
	if spec.cred, err = userCredential(&user, resolve, co); err != nil {
		return clusterSpec{}, fmt.Errorf("user %q: %w", userName, err)
	}
	return spec, nil
}

// contextPrefix starts an error about an entry the context names.
func contextPrefix(contextName string) string {
	if contextName == "" {
		return ""
	}
	return fmt.Sprintf("context %q: ", contextName)
}

// clusterTLS builds the TLS settings that verify the apiserver.
func clusterTLS(c *kubeconfigCluster, resolve func(string) string) (*tls.Config, error) {
	cfg := &tls.Config{
		MinVersion:         tls.VersionTLS12,
		ServerName:         c.TLSServerName,
		InsecureSkipVerify: c.InsecureSkipTLSVerify,
	}
	// Inline data wins over a file, as in client-go.
	caPEM := c.CertificateAuthorityData
	if len(caPEM) == 0 && c.CertificateAuthority != "" {
		var err error
		if caPEM, err = os.ReadFile(resolve(c.CertificateAuthority)); err != nil {
			return nil, fmt.Errorf("reading certificate-authority: %w", err)
		}
	}
	if len(caPEM) > 0 {
		// client-go refuses this combination: it is almost always a
		// mistake that silently disables the CA.
		if c.InsecureSkipTLSVerify {
			return nil, errors.New("certificate-authority and insecure-skip-tls-verify cannot be used together")
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(caPEM) {
			return nil, errors.New("certificate-authority holds no PEM certificate")
		}
		// Only the cluster's CA, not the system roots, as in client-go.
		cfg.RootCAs = pool
	}
	return cfg, nil
}

// userTLS adds the user's client certificate, if any, to cfg.
func userTLS(cfg *tls.Config, u *kubeconfigUser, resolve func(string) string) error {
	certPEM, keyPEM := u.ClientCertificateData, u.ClientKeyData
	var err error
	if len(certPEM) == 0 && u.ClientCertificate != "" {
		if certPEM, err = os.ReadFile(resolve(u.ClientCertificate)); err != nil {
			return fmt.Errorf("reading client-certificate: %w", err)
		}
	}
	if len(keyPEM) == 0 && u.ClientKey != "" {
		if keyPEM, err = os.ReadFile(resolve(u.ClientKey)); err != nil {
			return fmt.Errorf("reading client-key: %w", err)
		}
	}
	switch {
	case len(certPEM) == 0 && len(keyPEM) == 0:
		return nil
	case len(certPEM) == 0:
		return errors.New("client-key given without client-certificate")
	case len(keyPEM) == 0:
		return errors.New("client-certificate given without client-key")
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		// The error of X509KeyPair names no key material.
		return fmt.Errorf("loading client certificate: %w", err)
	}
	cfg.Certificates = []tls.Certificate{cert}
	return nil
}

// userCredential returns what goes into the Authorization header.
func userCredential(u *kubeconfigUser, resolve func(string) string, co clockOptions) (credential, error) {
	if present(u.Exec) {
		return nil, fmt.Errorf("exec credential plugins are %w", ErrUnsupportedAuth)
	}
	if present(u.AuthProvider) {
		return nil, fmt.Errorf("auth-provider is %w", ErrUnsupportedAuth)
	}
	if u.Impersonate != "" || u.ImpersonateUID != "" || len(u.ImpersonateGroups) > 0 || len(u.ImpersonateUserExtra) > 0 {
		return nil, ErrUnsupportedImpersonation
	}
	hasToken := u.Token != "" || u.TokenFile != ""
	hasBasic := u.Username != "" || u.Password != ""
	if hasToken && hasBasic {
		// client-go refuses this too: which one would the user mean?
		return nil, errors.New("token and username/password cannot be used together")
	}
	switch {
	case u.TokenFile != "":
		// tokenFile wins over token, as in client-go: the file is the
		// one that stays current.
		return newFileToken(resolve(u.TokenFile), co.refreshInterval, co.now)
	case u.Token != "":
		return staticToken(u.Token), nil
	case hasBasic:
		return basicAuth{username: u.Username, password: u.Password}, nil
	}
	return noCredential{}, nil
}
