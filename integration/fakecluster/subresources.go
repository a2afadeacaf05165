package fakecluster

import (
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/httpstream/wsstream"
	"k8s.io/apimachinery/pkg/util/proxy"
	apiproxy "k8s.io/apiserver/pkg/util/proxy"
)

// serveSubresource serves a request for a pod subresource as the apiserver
// would: authorize, find the pod, then stream.
func (c *Cluster) serveSubresource(w http.ResponseWriter, r *http.Request, namespace, podName string, sub Subresource) {
	rec := &recorder{ResponseWriter: w}
	entry := Request{
		Subresource: sub,
		Namespace:   namespace,
		Pod:         podName,
		Method:      r.Method,
		RawQuery:    r.URL.RawQuery,
		Upgrade:     r.Header.Get("Upgrade"),
	}
	if wsstream.IsWebSocketRequest(r) {
		for _, p := range strings.Split(r.Header.Get(wsstream.WebSocketProtocolHeader), ",") {
			if p = strings.TrimSpace(p); p != "" {
				entry.Protocols = append(entry.Protocols, p)
			}
		}
	} else {
		entry.Protocols = append(entry.Protocols, r.Header.Values("X-Stream-Protocol-Version")...)
	}
	index := c.stats.recordStart(entry)
	defer func() {
		status, hijacked := rec.result()
		c.stats.recordEnd(index, status, hijacked)
	}()

	// The apiserver's request info: the verb follows from the method.
	var verb string
	switch {
	case r.Method == http.MethodGet:
		verb = "get"
	case r.Method == http.MethodPost && sub != Log:
		verb = "create"
	default:
		writeStatus(rec, apierrors.NewMethodNotSupported(schema.GroupResource{Resource: "pods/" + string(sub)}, r.Method))
		return
	}
	if err := c.authorize(r, verb, namespace, podName, sub); err != nil {
		writeStatus(rec, err)
		return
	}
	var pod corev1.Pod
	if err := c.apiCall(r.Context(), credentialsOf(r), http.MethodGet, "/api/v1/namespaces/"+namespace+"/pods/"+podName, nil, &pod); err != nil {
		writeStatus(rec, err)
		return
	}

	r = r.Clone(r.Context())
	withoutCredentials(r.Header)
	switch sub {
	case Exec, Attach:
		c.serveRemoteCommand(rec, r, &pod, sub)
	case PortForward:
		c.servePortForward(rec, r, &pod)
	case Log:
		c.serveLog(rec, r, &pod)
	}
}

// authorize asks the apiserver whether the client may use the subresource,
// with the client's own credentials, for the attributes the apiserver's
// authorization filter would check.
func (c *Cluster) authorize(r *http.Request, verb, namespace, podName string, sub Subresource) error {
	creds := credentialsOf(r)
	attributes := authorizationv1.ResourceAttributes{
		Namespace:   namespace,
		Verb:        verb,
		Resource:    "pods",
		Subresource: string(sub),
		Name:        podName,
	}
	review := authorizationv1.SelfSubjectAccessReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "authorization.k8s.io/v1", Kind: "SelfSubjectAccessReview"},
		Spec:     authorizationv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &attributes},
	}
	if err := c.apiCall(r.Context(), creds, http.MethodPost, "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", &review, &review); err != nil {
		return err
	}
	if review.Status.Allowed {
		return nil
	}
	// The apiserver's message names the user; ask who that is.
	var who authenticationv1.SelfSubjectReview
	who.APIVersion, who.Kind = "authentication.k8s.io/v1", "SelfSubjectReview"
	_ = c.apiCall(r.Context(), creds, http.MethodPost, "/apis/authentication.k8s.io/v1/selfsubjectreviews", &who, &who)
	msg := fmt.Sprintf("User %q cannot %s resource %q in API group %q in the namespace %q",
		who.Status.UserInfo.Username, verb, "pods/"+string(sub), "", namespace)
	if review.Status.Reason != "" {
		msg += ": " + review.Status.Reason
	}
	return apierrors.NewForbidden(schema.GroupResource{Resource: "pods"}, podName, fmt.Errorf("%s", msg))
}

// validateContainer picks the container as the apiserver does: the named
// one, which must exist, or the only one.
func validateContainer(container string, pod *corev1.Pod) (string, error) {
	var names []string
	for _, c := range pod.Spec.Containers {
		names = append(names, c.Name)
	}
	for _, c := range pod.Spec.InitContainers {
		names = append(names, c.Name)
	}
	for _, c := range pod.Spec.EphemeralContainers {
		names = append(names, c.Name)
	}
	if container == "" {
		switch len(pod.Spec.Containers) {
		case 1:
			return pod.Spec.Containers[0].Name, nil
		case 0:
			return "", apierrors.NewBadRequest(fmt.Sprintf("a container name must be specified for pod %s", pod.Name))
		default:
			return "", apierrors.NewBadRequest(fmt.Sprintf("a container name must be specified for pod %s, choose one of: %s", pod.Name, names))
		}
	}
	for _, name := range names {
		if name == container {
			return container, nil
		}
	}
	return "", apierrors.NewBadRequest(fmt.Sprintf("container %s is not valid for pod %s", container, pod.Name))
}

// boolParams reads boolean query parameters as the apiserver's parameter
// codec does (absent is false).
func boolParams(q url.Values, names ...string) (map[string]bool, error) {
	out := make(map[string]bool, len(names))
	for _, name := range names {
		v := q.Get(name)
		if v == "" {
			continue
		}
		b, err := strconv.ParseBool(v)
		if err != nil {
			return nil, apierrors.NewBadRequest(fmt.Sprintf("invalid value %q for query parameter %s", v, name))
		}
		out[name] = b
	}
	return out, nil
}

// kubeletLocation is the URL of the kubelet endpoint for the pod.
func (c *Cluster) kubeletLocation(endpoint string, pod *corev1.Pod, container string, query url.Values) *url.URL {
	elems := []string{endpoint, pod.Namespace, pod.Name, string(pod.UID)}
	if container != "" {
		elems = append(elems, container)
	}
	for i, e := range elems {
		elems[i] = url.PathEscape(e)
	}
	return &url.URL{
		Scheme:   c.kubeletURL.Scheme,
		Host:     c.kubeletURL.Host,
		Path:     "/" + strings.Join(elems, "/"),
		RawQuery: query.Encode(),
	}
}

func requireNode(pod *corev1.Pod) error {
	if pod.Spec.NodeName == "" {
		return apierrors.NewBadRequest(fmt.Sprintf("pod %s does not have a host assigned", pod.Name))
	}
	return nil
}

// serveRemoteCommand serves exec and attach as ExecREST and AttachREST of
// the apiserver do: the UpgradeAwareHandler proxies SPDY to the kubelet, and
// for WebSocket clients that speak v5.channel.k8s.io the StreamTranslator
// turns WebSocket into SPDY towards the kubelet.
func (c *Cluster) serveRemoteCommand(w http.ResponseWriter, r *http.Request, pod *corev1.Pod, sub Subresource) {
	q := r.URL.Query()
	flags, err := boolParams(q, "stdin", "stdout", "stderr", "tty")
	if err != nil {
		writeStatus(w, err)
		return
	}
	container, err := validateContainer(q.Get("container"), pod)
	if err != nil {
		writeStatus(w, err)
		return
	}
	if err := requireNode(pod); err != nil {
		writeStatus(w, err)
		return
	}
	if c.opts.RefuseWebSocketExec && wsstream.IsWebSocketRequest(r) {
		refuseWebSocket(w, "RefuseWebSocketExec")
		return
	}
	// the parameters as the apiserver's streamParams hands them to the kubelet
	params := url.Values{}
	for name, kubeletName := range map[string]string{"stdin": corev1.ExecStdinParam, "stdout": corev1.ExecStdoutParam, "stderr": corev1.ExecStderrParam, "tty": corev1.ExecTTYParam} {
		if flags[name] {
			params.Add(kubeletName, "1")
		}
	}
	if sub == Exec {
		for _, command := range q["command"] {
			params.Add("command", command)
		}
	}
	location := c.kubeletLocation(string(sub), pod, container, params)

	handler := proxy.NewUpgradeAwareHandler(location, c.kubeletTransport, false, true, errorResponder{})
	translator := apiproxy.NewStreamTranslatorHandler(location, c.kubeletTransport, 0, apiproxy.Options{
		Stdin:  flags["stdin"],
		Stdout: flags["stdout"],
		Stderr: flags["stderr"],
		Tty:    flags["tty"],
	})
	apiproxy.NewTranslatingHandler(handler, translator, wsstream.IsWebSocketRequestWithStreamCloseProtocol).ServeHTTP(w, r)
}

// servePortForward serves portforward as PortForwardREST of the apiserver
// does: the UpgradeAwareHandler proxies SPDY to the kubelet, and WebSocket
// clients that tunnel SPDY (SPDY/3.1+portforward.k8s.io) go through the
// TunnelingHandler, which unwraps the tunnel into the same proxy.
func (c *Cluster) servePortForward(w http.ResponseWriter, r *http.Request, pod *corev1.Pod) {
	if err := requireNode(pod); err != nil {
		writeStatus(w, err)
		return
	}
	params := url.Values{}
	var ports []string
	for _, p := range r.URL.Query()["ports"] {
		for _, s := range strings.Split(p, ",") {
			port, err := strconv.ParseUint(strings.TrimSpace(s), 10, 16)
			if err != nil || port == 0 {
				writeStatus(w, apierrors.NewBadRequest(fmt.Sprintf("invalid port %q", s)))
				return
			}
			ports = append(ports, strconv.FormatUint(port, 10))
		}
	}
	if len(ports) > 0 {
		params.Add(corev1.PortHeader, strings.Join(ports, ","))
	}
	if c.opts.RefuseWebSocketPortForward && wsstream.IsWebSocketRequest(r) {
		refuseWebSocket(w, "RefuseWebSocketPortForward")
		return
	}
	location := c.kubeletLocation("portForward", pod, "", params)
	handler := proxy.NewUpgradeAwareHandler(location, c.kubeletTransport, false, true, errorResponder{})
	tunneling := apiproxy.NewTunnelingHandler(handler)
	apiproxy.NewTranslatingHandler(handler, tunneling, wsstream.IsWebSocketRequestWithTunnelingProtocol).ServeHTTP(w, r)
}

// refuseWebSocket answers a WebSocket upgrade as an apiserver that passes it
// on to a kubelet that does not speak the protocol: 400 Bad Request.
func refuseWebSocket(w http.ResponseWriter, option string) {
	http.Error(w, "unable to upgrade connection: WebSocket upgrades are refused here (fakecluster Options."+option+")", http.StatusBadRequest)
}

// logLines is how many lines a log without follow has.
const logLines = 5

// serveLog writes the container's log: logLines lines, or with follow=true
// a line every Options.LogInterval, flushed at once, until the client goes
// away or the Cluster closes.
func (c *Cluster) serveLog(w http.ResponseWriter, r *http.Request, pod *corev1.Pod) {
	q := r.URL.Query()
	flags, err := boolParams(q, "follow", "timestamps", "previous")
	if err != nil {
		writeStatus(w, err)
		return
	}
	if _, err := validateContainer(q.Get("container"), pod); err != nil {
		writeStatus(w, err)
		return
	}
	defer c.stats.start(Log)()
	w.Header().Set("Content-Type", "text/plain")
	w.WriteHeader(http.StatusOK)
	if pod.Spec.NodeName == "" {
		return // the apiserver has no kubelet to ask and answers with nothing
	}
	flusher := http.NewResponseController(w)
	writeLine := func(n int) error {
		now := time.Now().UTC()
		line := fmt.Sprintf("line %d %s\n", n, now.Format(time.RFC3339Nano))
		if flags["timestamps"] {
			line = now.Format(time.RFC3339Nano) + " " + line
		}
		if _, err := fmt.Fprint(w, line); err != nil {
			return err
		}
		return flusher.Flush()
	}
	if !flags["follow"] {
		for n := 1; n <= logLines; n++ {
			if writeLine(n) != nil {
				return
			}
		}
		return
	}
	ticker := time.NewTicker(c.opts.LogInterval)
	defer ticker.Stop()
	for n := 1; ; n++ {
		if writeLine(n) != nil {
			return
		}
		select {
		case <-r.Context().Done():
			return
		case <-c.closing.Done():
			return
		case <-ticker.C:
		}
	}
}
