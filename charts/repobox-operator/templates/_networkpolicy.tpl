{{/* Egress rules shared by the runner and operator NetworkPolicies. */}}
{{- define "repobox.np.dns" -}}
- to:
    {{- toYaml .Values.networkPolicy.dns.to | nindent 4 }}
  ports:
    - protocol: UDP
      port: 53
    - protocol: TCP
      port: 53
{{- end -}}
{{- define "repobox.np.redis" -}}
{{- $r := .Values.networkPolicy.redis -}}
{{- if or $r.cidrs $r.podSelector -}}
- to:
    {{- range $r.cidrs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
    {{- if $r.podSelector }}
    - podSelector:
        {{- toYaml $r.podSelector | nindent 8 }}
      namespaceSelector:
        {{- if $r.namespaceSelector }}
        {{- toYaml $r.namespaceSelector | nindent 8 }}
        {{- else }}
        matchLabels:
          kubernetes.io/metadata.name: {{ $r.namespace | default .Release.Namespace }}
        {{- end }}
    {{- end }}
  ports:
    - protocol: TCP
      port: {{ $r.port }}
{{- end }}
{{- end -}}
