package fakecluster

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const (
	// DefaultContainer is the container of a pod from CreateRunningPod when
	// no container names are given.
	DefaultContainer = "main"
	// NodeName is the node the pods of CreateRunningPod are bound to; no
	// Node object exists for it.
	NodeName = "fakecluster-node"
	// podImage is what the pods pretend to run.
	podImage = "registry.invalid/fakecluster:latest"
)

// CreateRunningPod creates, as the user with the bearer token, the pod
// name in namespace with the named containers (DefaultContainer if none),
// bound to NodeName, and then sets its status to Running with every
// container running and ready, which no kubelet will do here. It creates
// the namespace and its default ServiceAccount when missing (no
// controller-manager does that either). It fails t on error.
func (c *Cluster) CreateRunningPod(t testing.TB, token, namespace, name string, containers ...string) *corev1.Pod {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	pod, err := c.CreateRunningPodContext(ctx, token, namespace, name, containers...)
	if err != nil {
		t.Fatal(err)
	}
	return pod
}

// CreateRunningPodContext is CreateRunningPod without a testing.TB.
func (c *Cluster) CreateRunningPodContext(ctx context.Context, token, namespace, name string, containers ...string) (*corev1.Pod, error) {
	if len(containers) == 0 {
		containers = []string{DefaultContainer}
	}
	creds := bearer(token)

	ns := corev1.Namespace{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Namespace"},
		ObjectMeta: metav1.ObjectMeta{Name: namespace},
	}
	if err := c.apiCall(ctx, creds, http.MethodPost, "/api/v1/namespaces", &ns, nil); err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("fakecluster: create namespace %s: %w", namespace, err)
	}
	// The ServiceAccount admission plugin refuses pods whose ServiceAccount
	// does not exist.
	sa := corev1.ServiceAccount{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "ServiceAccount"},
		ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: namespace},
	}
	if err := c.apiCall(ctx, creds, http.MethodPost, "/api/v1/namespaces/"+namespace+"/serviceaccounts", &sa, nil); err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("fakecluster: create the default ServiceAccount of namespace %s: %w", namespace, err)
	}

	noAutomount := false
	var zero int64
	pod := corev1.Pod{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{
			Name:      name,
			Namespace: namespace,
			Labels:    map[string]string{"app.kubernetes.io/managed-by": "fakecluster"},
		},
		Spec: corev1.PodSpec{
			NodeName:                      NodeName,
			AutomountServiceAccountToken:  &noAutomount,
			TerminationGracePeriodSeconds: &zero,
		},
	}
	for _, container := range containers {
		pod.Spec.Containers = append(pod.Spec.Containers, corev1.Container{Name: container, Image: podImage})
	}
	var created corev1.Pod
	if err := c.apiCall(ctx, creds, http.MethodPost, "/api/v1/namespaces/"+namespace+"/pods", &pod, &created); err != nil {
		return nil, fmt.Errorf("fakecluster: create pod %s/%s: %w", namespace, name, err)
	}

	now := metav1.Now()
	started := true
	status := &created.Status
	status.Phase = corev1.PodRunning
	status.HostIP = "127.0.0.1"
	status.HostIPs = []corev1.HostIP{{IP: "127.0.0.1"}}
	status.PodIP = "127.0.0.1"
	status.PodIPs = []corev1.PodIP{{IP: "127.0.0.1"}}
	status.StartTime = &now
	status.Conditions = nil
	for _, condition := range []corev1.PodConditionType{corev1.PodScheduled, corev1.PodInitialized, corev1.ContainersReady, corev1.PodReady} {
		status.Conditions = append(status.Conditions, corev1.PodCondition{Type: condition, Status: corev1.ConditionTrue, LastTransitionTime: now})
	}
	status.ContainerStatuses = nil
	for _, container := range containers {
		status.ContainerStatuses = append(status.ContainerStatuses, corev1.ContainerStatus{
			Name:        container,
			Image:       podImage,
			ImageID:     podImage,
			ContainerID: fmt.Sprintf("fakecluster://%s-%s", created.UID, container),
			Ready:       true,
			Started:     &started,
			State:       corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
		})
	}
	var updated corev1.Pod
	if err := c.apiCall(ctx, creds, http.MethodPut, "/api/v1/namespaces/"+namespace+"/pods/"+name+"/status", &created, &updated); err != nil {
		return nil, fmt.Errorf("fakecluster: set the status of pod %s/%s to Running: %w", namespace, name, err)
	}
	return &updated, nil
}
