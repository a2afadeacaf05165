package fakecluster

import (
	"fmt"
	"net/http"
	"time"

	"k8s.io/apimachinery/pkg/types"
	remotecommandconsts "k8s.io/apimachinery/pkg/util/remotecommand"
	"k8s.io/kubelet/pkg/cri/streaming/portforward"
	remotecommandserver "k8s.io/kubelet/pkg/cri/streaming/remotecommand"
)

// The kubelet's streaming defaults (k8s.io/kubelet/pkg/cri/streaming
// DefaultConfig).
const (
	streamIdleTimeout     = 4 * time.Hour
	streamCreationTimeout = remotecommandconsts.DefaultStreamCreationTimeout
)

// kubeletHandler serves the kubelet's streaming endpoints in the form the
// apiserver calls them (with the pod's UID in the path, which the kubelet
// accepts too) and answers them with the kubelet streaming library over the
// fake runtime, as the kubelet and the container runtime's streaming server
// together would.
func kubeletHandler(rt *fakeRuntime) http.Handler {
	mux := http.NewServeMux()
	for _, method := range []string{http.MethodGet, http.MethodPost} {
		mux.HandleFunc(method+" /exec/{namespace}/{pod}/{uid}/{container}", func(w http.ResponseWriter, r *http.Request) {
			opts, err := remotecommandserver.NewOptions(r)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			remotecommandserver.ServeExec(w, r, rt, podName(r), types.UID(r.PathValue("uid")), r.PathValue("container"),
				r.URL.Query()["command"], opts, streamIdleTimeout, streamCreationTimeout, remotecommandconsts.SupportedStreamingProtocols)
		})
		mux.HandleFunc(method+" /attach/{namespace}/{pod}/{uid}/{container}", func(w http.ResponseWriter, r *http.Request) {
			opts, err := remotecommandserver.NewOptions(r)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			remotecommandserver.ServeAttach(w, r, rt, podName(r), types.UID(r.PathValue("uid")), r.PathValue("container"),
				opts, streamIdleTimeout, streamCreationTimeout, remotecommandconsts.SupportedStreamingProtocols)
		})
		mux.HandleFunc(method+" /portForward/{namespace}/{pod}/{uid}", func(w http.ResponseWriter, r *http.Request) {
			opts, err := portforward.NewV4Options(r)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			portforward.ServePortForward(w, r, rt, podName(r), types.UID(r.PathValue("uid")), opts,
				streamIdleTimeout, streamCreationTimeout, portforward.SupportedProtocols)
		})
	}
	return mux
}

// podName is how the fake runtime names a pod: "namespace/name".
func podName(r *http.Request) string {
	return fmt.Sprintf("%s/%s", r.PathValue("namespace"), r.PathValue("pod"))
}
